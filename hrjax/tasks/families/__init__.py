"""One module per task family. Each registers its builder with `hrjax.tasks.registry.register`;
`hrjax.tasks.datasets` imports every module here, so a new benchmark is one new file."""
