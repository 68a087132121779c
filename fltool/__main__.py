from fltool.cli import main

main()
