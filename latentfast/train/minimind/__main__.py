from latentfast.train.minimind.cli import cli

cli()
