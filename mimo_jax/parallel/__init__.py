"""Device meshes, logical-axis rule presets and shardings for training across many devices.

    parallelism = Parallelism.from_config(mesh_config_from_dict(config.mesh))
    params, param_shardings = parallelism.param_shardings(model)
    step = parallelism.jit_train_step(train_step, state_shardings, batch_shardings)
"""

from mimo_jax.parallel.config import MESH_AXES, MeshConfig, mesh_config_from_dict
from mimo_jax.parallel.mesh import initialize_distributed, make_mesh, mesh_shape
from mimo_jax.parallel.rules import PRESETS, get_rules
from mimo_jax.parallel.sharding import Parallelism, shardings_like_params

__all__ = [
    "MESH_AXES", "MeshConfig", "mesh_config_from_dict", "initialize_distributed", "make_mesh",
    "mesh_shape", "PRESETS", "get_rules", "Parallelism", "shardings_like_params",
]
