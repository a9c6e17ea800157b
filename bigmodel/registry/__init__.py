"""MLflow: the store, registered versions and aliases, run tracking, ``bigmodel-registry``.

Modules: ``store`` (connecting, experiments, model folders as run artifacts, lineage tags),
``versions`` (registering, ``models:/`` references, aliases with their history, rollback, the
cache of downloaded versions: ``resolve_model_uri``), ``tracking`` (a training run logged to
MLflow from rank 0), ``cli`` (``bigmodel-registry``).

Kept empty on purpose: ``tracking`` is imported by every training worker and loads MLflow only
when tracking is on; ``store``, ``versions`` and ``cli`` import MLflow at once.
"""
