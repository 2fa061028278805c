from glm_cli.app import main

main()
