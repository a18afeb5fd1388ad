#!/bin/bash
cd /work/wt-measure
L=target/release/roomcast-load
B=/work/wt-before/target/release/roomcast
A=/work/wt-measure/target/release/roomcast
F=loadtest/results/2026-12-01/flood-fixed
I=loadtest/results/2026-12-01/idle
log=/tmp/measure-runs.log
bin() { if [ $1 = before ]; then echo $B; else echo $A; fi; }
run() { # name bin args...
  local name=$1; shift
  echo "$(date +%T) START $name load: $(cut -d' ' -f1-3 /proc/loadavg)" >> $log
  "$@" > /tmp/measure-out-$name.txt 2>&1
  echo "$(date +%T) END $name rc=$? load: $(cut -d' ' -f1-3 /proc/loadavg)" >> $log
}
for i in 1 2 3; do
  if [ $i = 2 ]; then order="after before"; else order="before after"; fi
  for kind in ping continuation; do for rel in $order; do
    run flood-$kind-$rel-run$i $L --spawn roomcast --relay-bin $(bin $rel) --json-out $F/$kind-$rel-run$i.json flood --kind $kind
  done; done
done
for rel in before after; do
  run flood-pong-$rel-run1 $L --spawn roomcast --relay-bin $(bin $rel) --json-out $F/pong-$rel-run1.json flood --kind pong
done
for i in 1 2 3; do
  if [ $i = 2 ]; then order="after before"; else order="before after"; fi
  for rel in $order; do
    run idle-$rel-run$i $L --spawn roomcast --relay-bin $(bin $rel) --json-out $I/idle-$rel-run$i.json idle --conns 15000 --rooms 100
  done
done
echo "$(date +%T) ALL DONE" >> $log
