"""``python -m proxy.manage``: runs the organizer CLI (``proxy.manage.cli``)."""

from proxy.manage.cli.main import main

main()
