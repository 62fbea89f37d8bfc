import sys

from kennel_ops.aws.cli import main

sys.exit(main())
