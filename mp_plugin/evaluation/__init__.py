"""Demo, evaluation and benchmark support: model loading, the trained-here zoo, real photos, Fashion-MNIST,
the main-job pipeline, metrics, latency and the baselines. The core never imports this package."""
