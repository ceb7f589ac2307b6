"""The durable store: request events and feedback in a relational database, for the analysis.

    schema.py      the tables, as SQLAlchemy Core objects (the one description of the schema)
    db.py          engine_for(url), migrate(engine), Store.write(events): idempotent batch writes
    collector.py   Collector: the event stream's consumer group -> Store, acking after commit
    rollup.py      each UTC day aggregated once for the report; which days are current
    migrations/    Alembic revisions, run in code by `migrate` (no alembic.ini)

SQLite (`sqlite:///abproxy.db`, the default) needs no set-up; PostgreSQL (`postgresql://...`)
is for production. The same statements run on both.
"""
