from openmoshi.cli.main import main

raise SystemExit(main())
