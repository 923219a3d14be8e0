from sqsbalancerd.cli import main

main()
