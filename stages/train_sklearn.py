"""Stage train_sklearn: the logistic-regression baseline on the train bottlenecks."""

from __future__ import annotations

from imgclf.config import load_params
from imgclf.heads.common import train_and_save_head
from imgclf.heads.sklearn_head import count_parameters, save_sklearn_head, train_sklearn_head
from imgclf.params import HeadsParams, TrainSklearnParams
from imgclf.stage import stage_main


@stage_main
def main() -> None:
    params = load_params()
    metrics = train_and_save_head(
        "sklearn",
        paths=params["paths"],
        shared=HeadsParams.from_params(params).as_kwargs(),
        train_fn=train_sklearn_head,
        save_fn=save_sklearn_head,
        count_parameters=count_parameters,
        **TrainSklearnParams.from_params(params).as_kwargs(),
    )
    note = "" if metrics["converged"] else " (lbfgs did NOT converge: raise train_sklearn.max_iter)"
    print(
        f"train_sklearn: val_accuracy {metrics['final_val_accuracy']:.4f}, "
        f"{metrics['iterations']} lbfgs iterations, {metrics['train_seconds']:.1f} s{note}"
    )


if __name__ == "__main__":
    main()
