"""Training, evaluation and the model zoo: data, trainer, localization benchmark, CLI."""
