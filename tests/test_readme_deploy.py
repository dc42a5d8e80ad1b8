"""The deploy guide (docs/deploy.md), run as a new user would from a clean clone, against a fake ``az``.

Every ``bash`` block of the guide runs, in the order the guide gives them, in one shell
(``set -euo pipefail``) in a copy of the repository's files with ``make install``'s
environment active. ``az`` is tests/fake_az.py; the deployment's outputs point at a real app on
loopback (the real worker over Azurite and a simulator serving the deployed names), so
``make deploy``'s health wait and doctor, ``curl`` and the doctor of the section run for
real. Stood in for: Entra sign-in to the tables from a laptop (the organizer CLI reaches
Azurite with a connection string) and Azure itself. The section ends with the tear-down, and a
new ``make deploy`` into the same group then succeeds: the soft-deleted account was purged.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.deploy.models import parameter
from tests.fake_az import clone_repository, commands, put_on_path
from tests.support import CODE_HASH_KEY, ORGANIZER_KEY, ROOT, app_env, start_app, start_azurite, start_simulator

MODEL_LISTS = json.loads((ROOT / "tests" / "data" / "az_model_list.json").read_text())
SERVED = {"gpt-5.4": "reasoning", "text-embedding-3-small": "embeddings"}


def section_blocks() -> list[str]:
    guide = (ROOT / "docs" / "deploy.md").read_text()
    return [textwrap.dedent(block) for block in re.findall(r"```bash\n(.*?)```", guide, flags=re.S)]


@pytest.fixture(scope="module")
def deployed() -> Iterator[tuple[str, str]]:
    """The "deployed" app and its storage, of its own: the section's doctor checks every event stored."""
    azurite, storage = start_azurite()
    simulator, upstream = start_simulator(*[f"--deployment={name}={kind}" for name, kind in SERVED.items()])
    service, url = start_app(app_env(storage, upstream))
    yield url, storage
    service.stop()
    simulator.stop()
    azurite.stop()


def test_every_command_of_the_deploy_section_runs(deployed: tuple[str, str], tmp_path: Path) -> None:
    app, azurite = deployed
    clone = clone_repository(tmp_path)
    defaults = parameter((clone / "infra" / "main.bicepparam").read_text(), "modelDeployments")
    outputs = {
        "AZURE_FUNCTION_APP_NAME": "evtproxy-func-abc123",
        "AZURE_FUNCTION_APP_URL": app,
        "AZURE_OPENAI_ENDPOINT": "https://evtproxy-oai-abc123.openai.azure.com/",
        "STORAGE_TABLE_ENDPOINT": "https://evtproxyst.table.core.windows.net/",
    }
    state = {"group": "my-event", "model_lists": {"eastus2": MODEL_LISTS["constructed"]["entries"]},
             "deployed_models": defaults, "file_models": defaults, "expected_key": ORGANIZER_KEY,
             "code_hash_key": CODE_HASH_KEY, "outputs": outputs, "logged_in": False}  # fmt: skip
    env, log = put_on_path(tmp_path, state)
    venv = clone / ".venv" / "bin"
    env.update(
        PATH=f"{env['PATH'].split(':', 1)[0]}:{venv}:{env['PATH'].split(':', 1)[1]}",  # fake az first, then the venv
        VIRTUAL_ENV=str(clone / ".venv"),
        ORGANIZER_KEY=ORGANIZER_KEY,  # the organizer exported their key, as the section allows
        STORAGE_CONNECTION_STRING=azurite,  # stands in for an Entra sign-in to the deployed tables
        GITHUB_CLIENT_ID="Iv1.0123456789abcdef",  # noted from the GitHub OAuth app, as the guide says
        GITHUB_CLIENT_SECRET="github-secret-" + "x" * 26,
    )
    blocks = section_blocks()
    assert len(blocks) >= 6, blocks
    script = "set -euo pipefail\n" + "\n".join(f"echo '### block {i}'\n{block}" for i, block in enumerate(blocks))
    done = subprocess.run(
        ["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    print(done.stdout[-6000:], done.stderr[-4000:])
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.count("All good.") >= 3  # make deploy twice, and the doctor of the section
    assert '"storage": "ok"' in done.stdout.replace('"storage":"ok"', '"storage": "ok"')
    ran = commands(log)
    assert ran[0] == "az login"
    assert "az group delete -n my-event --yes" in ran
    assert "az cognitiveservices account purge -g my-event -l eastus2 -n evtproxy-oai-abc123" in ran
    state_after = json.loads(Path(env["FAKE_AZ_STATE"]).read_text())
    assert state_after["deleted_accounts"] == [] and not state_after["group_exists"]
    # GitHub sign-in for attendees: the provider on, anonymous calls let through, the app told to trust it.
    assert state_after["github_provider"] == {"clientId": env["GITHUB_CLIENT_ID"]}
    assert state_after["auth"] == {"enabled": "true", "action": "AllowAnonymous"}
    assert state_after["app_settings"]["ATTENDEE_SIGN_IN"] == "github"

    # Deploying again into the same group, at once: nothing is left soft-deleted to block it.
    again = subprocess.run(
        ["make", "--no-print-directory", "deploy", "RG=my-event", "LOCATION=eastus2", "ARGS=--interval 0.2 --wait 30"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=300, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    print(again.stdout[-3000:], again.stderr[-2000:])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Soft-deleted" not in again.stdout and "All good." in again.stdout
