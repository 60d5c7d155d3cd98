"""The MLflow store runs go to, checked before use.

Without MLFLOW_TRACKING_URI, runs go to `sqlite:///<root>/mlflow.db` with artifacts in
`<root>/mlartifacts/`, where <root> is the ORIGINAL repository: `dvc exp run --temp/--queue` run
the stage in a fresh git repo under `.dvc/tmp/exps/`, and DVC passes the original root in the
DVC_ROOT variable (dvc/repo/experiments/queue/base.py), so every run of every kind lands in the
one store that `make ui` shows. With MLFLOW_TRACKING_URI (and the usual MLFLOW_* variables) set,
a team tracking server is used unchanged.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from imgclf.config import repo_root
from imgclf.downloads import unreachable
from imgclf.errors import UserError

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    registry_uri: str
    artifact_root: str | None  # for new experiments; None = the server decides
    is_default: bool  # the embedded sqlite store at the repository root

    @property
    def db(self) -> Path | None:
        """The default store's SQLite file (<root>/mlflow.db); None for any other store."""
        return Path(self.tracking_uri.removeprefix("sqlite:///")) if self.is_default else None


def resolve_store(root: str | Path | None = None, tracking_uri: str | None = None) -> Store:
    """Where runs go: `tracking_uri`, else MLFLOW_TRACKING_URI, else the embedded store at the
    original repository root (sqlite:///<root>/mlflow.db + <root>/mlartifacts)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        registry = os.environ.get("MLFLOW_REGISTRY_URI") or uri
        return Store(uri, registry, None, is_default=False)
    base = Path(root).resolve() if root is not None else repo_root()
    uri = f"sqlite:///{base / DB_FILE}"
    return Store(uri, uri, (base / ARTIFACTS_DIR).as_uri(), is_default=True)


class TrackingStoreError(UserError):
    """The MLflow store cannot be used as it is: a damaged or outdated database, a server that
    does not answer, a deleted experiment."""


def configure_store(root: str | Path | None = None, tracking_uri: str | None = None) -> Store:
    """Point the `mlflow` module at the store (see `resolve_store`) and return it; raises
    TrackingStoreError when the store cannot be used."""

    store = resolve_store(root, tracking_uri)
    check_store(store)
    use_store(store)
    return store


def check_store(store: Store) -> None:
    """Raise TrackingStoreError unless `store` can be used: its tracking server answers, or
    the project's SQLite file opens (it is created when there is none)."""
    if store.is_default:
        _init_sqlite_store(store)
    else:
        check_server(store.tracking_uri)


def open_existing_store(root: str | Path | None = None) -> Store:
    """The store (see `resolve_store`), checked for reading what the pipeline registered: the
    project's mlflow.db must exist (reading never creates one) and open, or the tracking
    server must answer; raises TrackingStoreError."""
    store = resolve_store(root)
    if store.db is not None and not store.db.is_file():
        raise TrackingStoreError(
            f"no MLflow store at {store.db}: run the pipeline first (make run) or set "
            "MLFLOW_TRACKING_URI to the tracking server that has the model"
        )
    check_store(store)
    return store


def is_server(uri: str) -> bool:
    """Whether a tracking URI names a tracking server (http or https), not a database."""
    return urllib.parse.urlsplit(uri).scheme.lower() in ("http", "https")


def check_server(uri: str) -> None:
    """Raise TrackingStoreError unless the tracking server at an http(s) `uri` answers.
    MLflow's own client retries a server that is not there for about four minutes, without a
    word, then fails with a traceback: one request first says it in seconds."""
    if not is_server(uri):
        return
    why = unreachable(uri.rstrip("/") + "/health")
    if why is not None:
        raise TrackingStoreError(
            f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer: {why}. "
            "Start it, or unset MLFLOW_TRACKING_URI to log to the project's own store "
            "(mlflow.db, which make ui shows)."
        )


def use_store(store: Store) -> None:
    """mlflow.set_tracking_uri / set_registry_uri, without the registry's environment variable
    they leave behind: mlflow also writes MLFLOW_REGISTRY_URI, and a later `resolve_store` in
    this process would take it for the user's and read another store's registry."""
    import mlflow

    user_registry = os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.registry_uri)
    if user_registry is None:
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


def _init_sqlite_store(store: Store) -> None:
    # The first client to open a new database creates the "Default" experiment with an artifact
    # root of ./mlruns relative to the CURRENT directory (a temp exp copy, say). Creating the
    # store here first gives it <root>/mlartifacts, the folder `make ui` serves.
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from sqlalchemy.exc import SQLAlchemyError

    db = store.db
    try:
        SqlAlchemyStore(store.tracking_uri, store.artifact_root)
    except MlflowException as e:  # an outdated schema: MLflow's message says how to upgrade
        raise TrackingStoreError(f"{db}: {' '.join(e.message.split())}") from None
    except SQLAlchemyError as e:
        cause = " ".join(str(getattr(e, "orig", None) or e).split())
        raise TrackingStoreError(
            f"{db}: MLflow cannot open this store ({cause}). The file holds the project's runs "
            "and registered models: restore it from a backup, or move it aside (mv "
            f"{db} {db}.damaged) and the next run of the track stage starts a new one."
        ) from None


def get_or_create_experiment(name: str, store: Store) -> str:
    """The experiment id for this pipeline: MLFLOW_EXPERIMENT_ID / MLFLOW_EXPERIMENT_NAME when
    set, else `name` (track.experiment), created under the store's artifact root."""
    from mlflow import MlflowClient

    client = MlflowClient(store.tracking_uri, store.registry_uri)
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingStoreError(
                f"MLflow experiment {name!r} is deleted (in the trash) in {store.tracking_uri}: "
                f"restore it (mlflow experiments restore --experiment-id {exp.experiment_id}) "
                "or set track.experiment to another name."
            )
        return exp.experiment_id
    try:
        # The kind the UI uses for an experiment of trained models (its GenAI view otherwise).
        return client.create_experiment(
            name,
            artifact_location=store.artifact_root,
            tags={"mlflow.experimentKind": "custom_model_development"},
        )
    except Exception:
        # Another run (a parallel `dvc queue start -j 2`) created it between our two calls.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
