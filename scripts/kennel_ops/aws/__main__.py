import sys

from kennel_aws.cli import main

sys.exit(main())
