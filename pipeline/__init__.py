"""The data path of embedctl: corpus, model resolution, encoder, vectors, indexes.

Nothing in this package imports Celery or Redis: the same functions run in-process (the embedded runner)
and inside a Celery task.
"""
