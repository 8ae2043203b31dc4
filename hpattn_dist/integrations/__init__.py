"""Integrations with training frameworks: ``deepspeed`` (the mpu for ``deepspeed.initialize``,
config checks, gradient scaling); imported on use, never by ``import hpattn_dist``."""
