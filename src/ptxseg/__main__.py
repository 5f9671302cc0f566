from ptxseg.cli import run

run()
