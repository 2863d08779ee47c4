"""The Flower ServerApp: composes the run's config and hands over to ``run_federation``."""

from __future__ import annotations

from logging import ERROR

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedprompt.federation.grid_session import GridPlan, run_plan
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import PLAN_KEY, config_from_run_config
from fedprompt.federation.run_monitor import RunFailed
from fedprompt.user_errors import USER_ERRORS

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of every fedprompt simulation and deployment.

    A run that cannot do what was asked raises ``RunFailed`` (an ``Exception``, unlike
    ``SystemExit``, which Flower's runtimes would take for a finished run), so Flower records
    the run as failed and ``flwr ls`` says so. A session (``grid_session``) runs a whole plan
    of points, each recording its own outcome.
    """
    plan = context.run_config.get(PLAN_KEY)
    if plan:
        run_plan(grid, GridPlan.load(str(plan)))
        return
    try:
        run_federation(grid, config_from_run_config(context.run_config), warm_up=True)
    except USER_ERRORS as err:
        log(ERROR, "[fedprompt] %s", err)
        raise RunFailed(str(err)) from None
