"""Eight fake CPU devices for every test, set before JAX runs anything, so sharding tests run here."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
