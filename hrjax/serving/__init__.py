"""Serving a trained router without the training code: the bundle format (`bundle`), the runtime
(`router`), `hrjax route` (`route`) and the OpenAI-compatible server (`server`). Nothing here imports
`hrjax.agent`, `hrjax.train`, `hrjax.models.encoder` or Orbax."""
