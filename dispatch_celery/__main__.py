from dispatch_celery.cli.commands import main

main()
