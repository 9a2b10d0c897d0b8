"""orbax checkpoints of the train state plus the data position (JSON)."""
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Async CheckpointManager under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, every_steps: int, keep: int = 3):
    self.every = every_steps
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True,
            create=True),
        item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def save(self, step: int, state, data_state: dict):
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_state):
    """Restore onto the shardings of ``abstract_state`` (ShapeDtypeStructs or
    arrays): a checkpoint saved on one mesh restores onto another."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
