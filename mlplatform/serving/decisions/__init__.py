"""The decision log: every decision the service gives, durable before it is answered, and
what can be done with it afterwards.

- ``log``: ``DecisionLog`` appends records to the replica's spool with group commit (fsync);
- ``spool``: the spool's layout on the node's disk and who may take a segment;
- ``compaction``: moves closed (and dead replicas') segments into the dataset ``decisions/log``,
  exactly once;
- ``records``: the record, its validation, its line format and Arrow schema;
- ``lookup``: ``find_decision``, in the spool then the dataset;
- ``replay``: recompute a logged decision's score from its logged features and model version;
- ``unconfirmed``: answers the idempotency store has not confirmed yet, kept on the node.

The request path (``mlplatform.serving.app``) imports ``log``, ``records`` and ``unconfirmed``;
nothing on it imports ``replay``.
"""
