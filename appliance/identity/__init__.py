"""Identity: DIDs to verified handles and handles to DIDs (resolver, store, worker, directory).

Beside the pipeline, below the query engine: query and api import it; it imports only the
shared base and `store` (the manifest and layout of the files it reads)."""
