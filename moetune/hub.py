"""Push a run to the Hugging Face Hub: the adapter or model, tokenizer, model card, resolved recipe and routing report.

    moetune push runs/my-run your-name/my-moe-lora --private
    moetune push runs/my-run your-name/my-moe --merged          # merge first, push the plain checkpoint

Checkpoints, optimizer states, training_args.bin and lock/marker files never leave the machine: only the run
dir's top-level files that match `UPLOAD_PATTERNS` (and no `IGNORE_PATTERNS`) are committed, in one commit with a
model card that names the repo. The token comes from `HF_TOKEN` or the saved login (`hf auth login`), is never
written by moetune and never printed. Whatever fails, the run dir is left as it was.
"""

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moetune.errors import MoetuneError


UPLOAD_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "adapter_config.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
    "recipe.yaml", "metrics.json", "data_report.json", "routing.json", "routing.png", "merge_report.json",
    "expert_selection.json",
]
IGNORE_PATTERNS = [
    "checkpoint-*", "optimizer.*", "scheduler.*", "rng_state*", "training_args.bin", "trainer_state.json",
    "*.lock", "*.tmp", ".*",
    "README.md",  # the card is rendered for the repo it goes to
]
NO_TOKEN = "no Hugging Face token found: set HF_TOKEN or run `hf auth login` (a token with write access)"


def files_to_upload(folder: Path) -> list[str]:
    """The top-level files of `folder` that a push uploads (subdirectories, i.e. checkpoints, never)."""
    from huggingface_hub.utils import filter_repo_objects

    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    return list(filter_repo_objects(names, allow_patterns=UPLOAD_PATTERNS, ignore_patterns=IGNORE_PATTERNS))


def push_run(run_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
             merged: bool = False, merge_dtype: str = "bfloat16") -> str:
    """Upload a run (or, with `merged`, its merged model) to a Hub model repo, creating the repo when needed.

    Args:
        run_dir: a run's output directory.
        repo_id: `owner/name` of the model repo.
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to (created from main when missing); None commits to main.
        merged: merge the LoRA adapter into the base first (`moetune.merging.merge_run`, in a temporary directory
            beside the run dir) and push the plain checkpoint.
        merge_dtype: dtype of the merged model.

    Returns:
        The URL of the commit.

    Raises:
        MoetuneError: no token; the Hub refused the repo (401/403, names the repo); the connection failed; or, with
            `merged`, a merge that does not verify. The run dir is never modified.
    """
    from huggingface_hub import HfApi, get_token

    from moetune.run_info import read_run_dir

    run = read_run_dir(run_dir)
    token = get_token()
    if not token:
        raise MoetuneError(NO_TOKEN)
    api = HfApi(token=token)
    with _explained_hub_errors(repo_id, token, api.endpoint):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    if not merged:
        return _commit(api, run.path, repo_id, revision, token)
    from moetune.merging import merge_run

    with tempfile.TemporaryDirectory(prefix=".moetune-push-", dir=run.path.parent) as tmp:
        out = Path(tmp) / run.path.name
        merge_run(run.path, out, merge_dtype)
        return _commit(api, out, repo_id, revision, token)


def _commit(api, folder: Path, repo_id: str, revision: str | None, token: str) -> str:
    from huggingface_hub import CommitOperationAdd

    from moetune.model_card import CARD_FILE, build_model_card

    # One commit: the files as they are plus a card whose snippet loads from this repo. huggingface_hub's
    # `upload_folder` is this same create_commit; going through it directly adds the card without writing it
    # into the run dir.
    card = str(build_model_card(folder, repo_id)).encode("utf-8")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in files_to_upload(folder)]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
    with _explained_hub_errors(repo_id, token, api.endpoint):
        info = api.create_commit(repo_id, operations=operations, revision=revision,
                                 commit_message=f"Upload {folder.name} with moetune")
    return info.commit_url


@contextmanager
def _explained_hub_errors(repo_id: str, token: str, endpoint: str) -> Iterator[None]:
    """Hub and network failures -> one MoetuneError naming the repo (and never the token)."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx

    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            message = (f"the Hub refused access to {repo_id!r} (HTTP {status}): the token cannot create or write this "
                       "repo. Check the owner in the repo id, and that the token has write access (set HF_TOKEN or "
                       "run `hf auth login`)")
        elif status == 404:
            message = f"repo {repo_id!r} was not found and could not be created with this token (HTTP 404)"
        else:
            message = f"the Hub rejected the push to {repo_id!r}: {str(err).splitlines()[0]}"
        raise MoetuneError(message.replace(token, "***")) from None
    except (httpx.TransportError, ConnectionError) as err:
        raise MoetuneError(
            f"the connection to the Hub ({endpoint}) failed while pushing to {repo_id!r}: "
            f"{str(err) or type(err).__name__}. Nothing was changed locally; run the same command again to retry"
            .replace(token, "***")
        ) from None
