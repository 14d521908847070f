"""Not shipped: the documentation's references generated from the code at build time (settings,
`wis2-chain` commands, dataset description fields, Prometheus metrics), for the MkDocs site of
`docs/` (`mkdocs.yml` loads `docsgen/hook.py`)."""
