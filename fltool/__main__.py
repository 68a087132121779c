from fltool.cli import entry

entry()
