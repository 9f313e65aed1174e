"""The CLI's subcommands, one small module per group. ``appliance.cli`` lists them."""
