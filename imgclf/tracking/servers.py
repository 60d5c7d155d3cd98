"""What `make ui` and `make serve` start: the MLflow UI of the store track logs to, and a
registered end-to-end model over HTTP, each after checking what it would otherwise fail on
half-way (a taken port, a model that is not registered).

`python -m imgclf.tracking.servers ui --port P` and `... serve-uri [MODEL] --port P`."""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path

from imgclf.errors import UserError
from imgclf.params import DataParams, TrackParams
from imgclf.tracking.registered import CHAMPION, registered_model_names
from imgclf.tracking.store import (
    TrackingStoreError,
    check_store,
    is_server,
    open_existing_store,
    resolve_store,
)


def ui_url(
    base_url: str = "http://127.0.0.1:5000",
    experiment: str = "tf-or-keras",
    root: str | Path | None = None,
) -> str:
    """The link that opens the experiment's runs in the UI's model-training view, on
    `base_url`, or on the tracking server's own UI when MLFLOW_TRACKING_URI names one. MLflow
    3's UI opens an experiment in its GenAI view (traces) unless the URL asks for
    workflowType=machine_learning; no server setting changes that."""
    store = resolve_store(root)
    base = (store.tracking_uri if is_server(store.tracking_uri) else base_url).rstrip("/")
    db = store.db
    experiment_id = None
    if db is None or db.is_file():
        from mlflow import MlflowClient

        check_store(store)  # a damaged mlflow.db, a server that does not answer: named
        exp = MlflowClient(store.tracking_uri).get_experiment_by_name(experiment)
        experiment_id = exp.experiment_id if exp is not None else None
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def check_port_free(port: int, instead: str) -> None:
    """Raise UserError when something already listens on 127.0.0.1:`port` (an earlier
    `make ui` or `make serve`, say): MLflow would print the link, then fail to bind."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise UserError(
                f"port {port} of 127.0.0.1 is in use (an earlier make ui or make serve?): stop "
                f"what listens there, or use another port: {instead}"
            ) from None


def run_ui(port: int, experiment: str, root: str | Path | None = None) -> None:
    """`make ui`: the UI of the store track logs to (mlflow.db, or the database
    MLFLOW_TRACKING_URI names) on 127.0.0.1:`port`, after printing the link that opens the
    experiment's runs. A tracking server has a UI of its own: only its link is printed."""
    store = resolve_store(root)
    served_here = not is_server(store.tracking_uri)
    if served_here:
        check_port_free(port, f"make ui UI_PORT={port + 1}")
    print(f"MLflow UI: open {ui_url(f'http://127.0.0.1:{port}', experiment, root)}")
    if not served_here:
        print("(the tracking server's own UI: MLFLOW_TRACKING_URI)")
        return
    print(f"(store: {store.tracking_uri})", flush=True)
    mlflow = Path(sys.executable).with_name("mlflow")
    argv = [str(mlflow), "ui", "--backend-store-uri", store.tracking_uri,
            "--default-artifact-root", store.artifact_root or "./mlartifacts",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    # MLflow 3's UI starts seven huey consumers for its GenAI jobs unless told not to; this
    # project has none, and they outlive a SIGTERM of the UI.
    os.execve(mlflow, argv, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


SERVED_BY_DEFAULT = "finetune_keras"


def serve_uri(model: str = "", root: str | Path | None = None) -> str:
    """The model URI `make serve` serves: `model`, or by default the @champion of this
    project's registered finetune_keras (its name follows data.source). A models:/ URI is
    checked against the registry first: one that names nothing raises TrackingStoreError
    listing what is registered (MLflow's server would start, then fail with a traceback)."""
    from imgclf.config import load_params

    if not model:
        params = load_params()
        source = DataParams.from_params(params).source
        names = registered_model_names(TrackParams.from_params(params).registered_models, source)
        model = f"models:/{names[SERVED_BY_DEFAULT]}@{CHAMPION}"
    if not model.startswith("models:/"):
        return model
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    store = open_existing_store(root)
    client = MlflowClient(store.tracking_uri, store.registry_uri)
    name, _, alias = model.removeprefix("models:/").partition("@")
    name, _, version = name.partition("/")
    try:
        client.get_registered_model(name)
    except MlflowException:
        what = f"registered model {name!r}"
    else:
        try:
            if alias:
                client.get_model_version_by_alias(name, alias)
            elif version.isdigit():  # not /latest or a stage name: MLflow resolves those
                client.get_model_version(name, version)
            return model
        except MlflowException:
            what = f"alias @{alias} of {name!r}" if alias else f"version {version} of {name!r}"
    registered = [
        m.name + "".join(f" @{a}" for a in sorted(m.aliases or {}))
        for m in client.search_registered_models()
    ]
    listing = "; ".join(sorted(registered)) or "none: run the pipeline first (make run)"
    raise TrackingStoreError(
        f"{model}: no {what} in {store.tracking_uri}. Registered: {listing}. Serve one with "
        "make serve MODEL=models:/<name>@champion (or /<version>)."
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m imgclf.tracking.servers ui --port P`: `run_ui` for track.experiment;
    `serve-uri [MODEL] --port P`: print `serve_uri(MODEL)`, once the port is free."""
    import argparse

    from imgclf.config import load_params

    parser = argparse.ArgumentParser(prog="python -m imgclf.tracking.servers")
    parser.add_argument("command", choices=["ui", "serve-uri"])
    parser.add_argument("model", nargs="?", default="")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve-uri":
            uri = serve_uri(args.model)
            check_port_free(args.port, f"make serve SERVE_PORT={args.port + 1}")
            print(uri)
            return
        try:
            experiment = load_params()["track"]["experiment"]
        except (FileNotFoundError, KeyError, TypeError):
            experiment = "tf-or-keras"
        run_ui(args.port, experiment)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
