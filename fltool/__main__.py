"""`python -m fltool ...` is the `fltool` command."""

from fltool.cli import main

main()
