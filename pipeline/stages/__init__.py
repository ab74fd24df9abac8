"""One module per DVC stage (dvc.yaml): a thin `run` over the library layers. A stage never imports another stage."""
