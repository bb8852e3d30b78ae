"""kiln.tracking: the experiment Kiln logs to is marked as model training, so MLflow 3's UI opens it on its runs."""

from mlflow import MlflowClient

from kiln.tracking import start_run


def _kind(name: str) -> str | None:
    return MlflowClient().get_experiment_by_name(name).tags.get("mlflow.experimentKind")


def test_a_new_experiment_is_a_training_experiment():
    start_run("kiln-kind-new", "run").end()
    assert _kind("kiln-kind-new") == "custom_model_development"


def test_an_existing_experiment_gets_the_kind_unless_it_has_one():
    client = MlflowClient()
    client.create_experiment("kiln-kind-old")  # made before Kiln set kinds: no kind, the UI shows traces
    client.create_experiment("kiln-kind-chosen", tags={"mlflow.experimentKind": "genai_development"})
    start_run("kiln-kind-old", "run").end()
    start_run("kiln-kind-chosen", "run").end()
    assert _kind("kiln-kind-old") == "custom_model_development"
    assert _kind("kiln-kind-chosen") == "genai_development"  # someone chose it in the UI: left alone
