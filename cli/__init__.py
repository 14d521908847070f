"""The `wis2-chain` command line (`cli.main:app`)."""
