#!/bin/bash
# Call 4: waits for the comparison call 3 left running, and collects it.
F=/tmp/final
for _ in $(seq 115); do [ -e $F/done ] && break; sleep 5; done
cp -r $F $OUT/final
echo "final: $( [ -e $F/done ] && echo done || echo running)"
sed -n '/^test /,$p' $F/nbd-compare.txt | head -150
