"""The one training engine (`Trainer`) and what it runs on: distributed setup, curves, the pretraining task."""
