"""Evaluation of generated samples: ADM's FID / sFID / IS / precision-recall (`adm_metrics`,
`inception`, `python -m dit_jax.evaluation`), FID during training (`in_training`), and the
digits demo's measurement (`python -m dit_jax.evaluation.digits`)."""
