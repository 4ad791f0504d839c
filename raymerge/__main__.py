from raymerge.cli import main

raise SystemExit(main())
