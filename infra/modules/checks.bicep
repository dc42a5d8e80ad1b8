// Settings the app would refuse at start (proxy/config/settings.py, with a message naming the
// setting), refused here at deploy time instead, before anything is created: each output is
// the value given, or fail() with what to change. main.bicep reads the values through these
// outputs, so every resource that uses one waits for the check.
// A module of its own: pycep, checkov's Bicep parser, predates fail(); tests/test_infra.py and
// checkov leave this file out, and devtools/deploy/bicep_check.py checks it with the rest.
param location string
param openAiExtraRegions array
param organizerEntraClientId string
param organizerEntraObjectIds string
param organizerEntraGroupIds string
param organizerEntraAdminObjectIds string
param organizerEntraAdminGroupIds string
param organizerEntraViewerObjectIds string
param organizerEntraViewerGroupIds string

var extraRegions = map(openAiExtraRegions, region => toLower(region))
var entraIds = filter(map(split('${organizerEntraObjectIds},${organizerEntraGroupIds},${organizerEntraAdminObjectIds},${organizerEntraAdminGroupIds},${organizerEntraViewerObjectIds},${organizerEntraViewerGroupIds}', ','), id => trim(id)), id => !empty(id))

// Each extra region is a backend named after it, beside the main one named after location;
// sign-in on with nobody allowed would lock every organizer out.
var mainRegionListed = contains(extraRegions, toLower(location))
var regionListedTwice = length(union(extraRegions, [])) != length(extraRegions)
var nobodyMaySignIn = !empty(organizerEntraClientId) && empty(entraIds)

output openAiExtraRegions array = mainRegionListed ? fail('openAiExtraRegions lists ${location}, the region of the main Azure OpenAI account: the app would name two backends ${toLower(location)} (AZURE_OPENAI_BACKENDS) and refuse to start. List other regions only.') : (regionListedTwice ? fail('openAiExtraRegions lists a region twice (${join(extraRegions, ', ')}): the app would refuse AZURE_OPENAI_BACKENDS. List each region once.') : openAiExtraRegions)
output organizerEntraClientId string = nobodyMaySignIn ? fail('organizerEntraClientId (ORGANIZER_ENTRA_CLIENT_ID) is set, but organizerEntraObjectIds, organizerEntraGroupIds and their Admin and Viewer twins (ORGANIZER_ENTRA_OBJECT_IDS, ORGANIZER_ENTRA_GROUP_IDS, ORGANIZER_ENTRA_ADMIN_..., ORGANIZER_ENTRA_VIEWER_...) are all empty: nobody could sign in as an organizer, and the app refuses to start. Set one of them, or leave the client id empty.') : organizerEntraClientId
