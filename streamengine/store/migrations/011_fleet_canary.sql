-- Whether a serving node takes part in canaries (NodeStatus.canary, serving.canary): the engine picks a
-- canary's nodes only among those that do (store/fleet.py live_nodes). Records without it: true.
ALTER TABLE fleet_nodes ADD COLUMN canary boolean NOT NULL DEFAULT true;
