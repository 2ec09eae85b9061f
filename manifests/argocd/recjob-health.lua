-- Argo CD health check for recjob.dev/RecJob (resource.customizations.health.recjob.dev_RecJob).
-- Healthy once the model is promoted; Degraded when failed or rolled back; Progressing
-- while training, converting or rolling out, or before the operator saw this generation.
local hs = {}
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the RecJob operator"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "the operator has not seen generation " .. obj.metadata.generation .. " yet"
  return hs
end
local phase = obj.status.phase
local message = obj.status.message or phase
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" or phase == "RolledBack" then
  hs.status = "Degraded"
elseif phase == "RollingOut" and obj.status.rollout ~= nil
    and obj.status.rollout.state == "AwaitingApproval" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
end
hs.message = message
return hs
