from prefdiag.cli import main

main()
