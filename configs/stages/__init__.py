"""The report's three pretraining stages (section 3.1), each a run config; a stage starts from
the previous one's workdir with `--config.init_from=WORKDIR`."""
