"""Report writers: they take a finished table and summary (no torch) and render or write them."""
