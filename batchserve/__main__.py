from batchserve.cli import main

raise SystemExit(main())
