from gwcore.cli import main

raise SystemExit(main())
