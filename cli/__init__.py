"""The `lpjepa` command line: one entry point, one subcommand family per stage of the data flow."""
