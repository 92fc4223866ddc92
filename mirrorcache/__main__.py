from mirrorcache.cli import main

raise SystemExit(main())
