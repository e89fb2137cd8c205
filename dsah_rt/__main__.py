"""`python -m dsah_rt`: the `dsah-rt` command line."""

from dsah_rt.cli import main

if __name__ == "__main__":  # importing the module (as the import-direction test does) runs nothing
    main(prog_name="dsah-rt")
