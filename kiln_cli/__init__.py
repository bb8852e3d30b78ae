"""The `kiln` command line (kiln_cli.main): the top layer, CLI -> flows -> stages -> core. Nothing under kiln/,
data/, reward/, stages/ or flows/ imports it. This file imports nothing, so that the ephemeral server's watchdog
(`python -m kiln_cli.prefect_server`) starts without the CLI's imports."""
