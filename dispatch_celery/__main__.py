from dispatch_celery.cli import main

main()
