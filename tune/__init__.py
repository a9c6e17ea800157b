"""Everything that knows Ray Tune: sweeps over distributed training runs (`bigmodel-tune`)."""
